package org.riskbridge.hapi;

import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.IDaoRegistry;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HibernatePropertiesProvider;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.config.util.ResourceCountCacheUtil;
import ca.uhn.fhir.jpa.dao.FulltextSearchSvcImpl;
import ca.uhn.fhir.jpa.dao.IFulltextSearchSvc;
import ca.uhn.fhir.jpa.dao.search.HSearchSortHelperImpl;
import ca.uhn.fhir.jpa.dao.search.IHSearchSortHelper;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirPostgresDialect;
import ca.uhn.fhir.jpa.provider.DaoRegistryResourceSupportedSvc;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.search.IStaleSearchDeletingSvc;
import ca.uhn.fhir.jpa.search.StaleSearchDeletingSvcImpl;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.util.LoggingEmailSender;
import ca.uhn.fhir.jpa.util.ResourceCountCache;
import ca.uhn.fhir.rest.api.IResourceSupportedSvc;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import org.apache.commons.dbcp2.BasicDataSource;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.beans.factory.config.BeanPostProcessor;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Lazy;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.Properties;
import javax.sql.DataSource;

/**
 * Storage side of the server: settings objects, the data source (H2 in memory by default, or PostgreSQL when
 * {@code spring.datasource.url} is a {@code jdbc:postgresql:} URL), the JPA entity manager factory / transaction
 * manager, and the handful of service beans that HAPI's {@code JpaConfig} expects the embedding application to
 * provide.
 */
@Configuration
public class StorageConfig {

	// ---------------------------------------------------------------- settings

	@Bean
	public JpaStorageSettings storageSettings(
			@Value("${riskbridge.fhir.reuse-cached-search-results-millis:60000}") long theReuseCachedSearchMillis,
			@Value("${riskbridge.fhir.allow-external-references:true}") boolean theAllowExternalReferences,
			@Value("${riskbridge.fhir.expunge-enabled:true}") boolean theExpungeEnabled,
			@Value("${riskbridge.fhir.search-prefetch-thresholds:-1}") String thePreFetchThresholds,
			@Value("${riskbridge.fhir.match-url-cache:false}") boolean theMatchUrlCache,
			@Value("${riskbridge.fhir.mass-ingestion-mode:false}") boolean theMassIngestionMode) {
		JpaStorageSettings retVal = new JpaStorageSettings();
		// Client-assigned ids such as PUT Patient/abc (non-numeric). Purely numeric client ids are
		// rejected by this strategy, server-assigned ids are sequential numbers.
		retVal.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ALPHANUMERIC);
		// HAPI reuses identical search results for 60 s by default. The sandbox keeps that default so
		// it behaves like a hospital's HAPI: clients must send Cache-Control: no-cache to see fresh writes.
		// 0 turns reuse off.
		retVal.setReuseCachedSearchResultsForMillis(theReuseCachedSearchMillis > 0 ? theReuseCachedSearchMillis : null);
		retVal.setAllowExternalReferences(theAllowExternalReferences);
		retVal.setExpungeEnabled(theExpungeEnabled);
		retVal.setDeleteExpungeEnabled(theExpungeEnabled);
		retVal.setAllowMultipleDelete(true);
		// Referential integrity stays ON (HAPI default) for writes and deletes.
		retVal.setEnforceReferentialIntegrityOnWrite(true);
		retVal.setEnforceReferentialIntegrityOnDelete(true);
		// No Lucene / Elasticsearch: _content / _text answer HAPI-0389 (full-text not enabled).
		retVal.setAdvancedHSearchIndexing(false);
		retVal.setHibernateSearchIndexFullText(false);
		retVal.setHibernateSearchIndexSearchParams(false);
		// HAPI loads a search's matches in stages (13, 503, 2003, ... by default) and a page request past a stage
		// waits for the next one (about 0.6 s each). riskbridge reads every page of every search, so the sandbox
		// loads all matches at once (-1); the stages stay configurable to reproduce a hospital's HAPI defaults.
		retVal.setSearchPreFetchThresholds(preFetchThresholds(thePreFetchThresholds));
		// Both off by default (HAPI's defaults); exposed so their effect can be measured (bench/fhir_io.py).
		retVal.setMatchUrlCacheEnabled(theMatchUrlCache);
		retVal.setMassIngestionMode(theMassIngestionMode);
		return retVal;
	}

	/** {@code "13,503,-1"} -> [13, 503, -1]; HAPI checks that the stages ascend and that -1 (all) comes last. */
	static List<Integer> preFetchThresholds(String theThresholds) {
		List<Integer> retVal = new ArrayList<>();
		for (String next : theThresholds.split(",")) {
			if (!next.isBlank()) {
				retVal.add(Integer.valueOf(next.trim()));
			}
		}
		return retVal;
	}

	/**
	 * How often batch2's maintenance pass runs (HAPI: once a minute). Batch2 jobs such as a bulk {@code $export}
	 * move on only in that pass: it queues a step's work chunks and opens the next step of a gated job, and a bulk
	 * export has four steps, so at HAPI's default even a tiny export takes minutes (12 resources of 3 types: 223 s
	 * at 60000 ms, 3.5 s at 1000 ms on 2 cores), too slow for tests that wait for it. The pass only reads the job
	 * table while no job runs. The interval is set here, before HAPI schedules the pass on context refresh;
	 * {@code 60000} restores HAPI's own behaviour.
	 */
	@Bean
	public static BeanPostProcessor batch2MaintenanceInterval(
			@Value("${riskbridge.fhir.batch2-maintenance-interval-millis:1000}") long theIntervalMillis) {
		return new BeanPostProcessor() {
			@Override
			public Object postProcessBeforeInitialization(Object theBean, String theBeanName) {
				if (theBean instanceof JobMaintenanceServiceImpl maintenance) {
					maintenance.setScheduledJobFrequencyMillis(theIntervalMillis);
				}
				return theBean;
			}
		};
	}

	@Bean
	public PartitionSettings partitionSettings() {
		// Partitioning disabled (HAPI default).
		return new PartitionSettings();
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		// No subscription channel types enabled; the subscription processors are not loaded anyway.
		return new SubscriptionSettings();
	}

	// ---------------------------------------------------------------- database

	/** The databases this launcher knows: JDBC driver and HAPI's Hibernate dialect for each. */
	enum Database {
		H2("org.h2.Driver", H2InlineTextDialect.class.getName()),
		POSTGRESQL("org.postgresql.Driver", HapiFhirPostgresDialect.class.getName());

		final String myDriverClassName;
		final String myDialectClassName;

		Database(String theDriverClassName, String theDialectClassName) {
			myDriverClassName = theDriverClassName;
			myDialectClassName = theDialectClassName;
		}

		/**
		 * The database a JDBC URL names: {@code jdbc:postgresql:...} is PostgreSQL, {@code jdbc:h2:...} is H2;
		 * anything else is refused at start-up rather than guessed.
		 */
		static Database forUrl(String theUrl) {
			String url = theUrl.trim().toLowerCase(Locale.ROOT);
			if (url.startsWith("jdbc:h2:")) {
				return H2;
			}
			if (url.startsWith("jdbc:postgresql:")) {
				return POSTGRESQL;
			}
			throw new IllegalArgumentException(
					"spring.datasource.url must be a jdbc:h2: or jdbc:postgresql: URL, not " + theUrl.split("\\?")[0]);
		}
	}

	/**
	 * The Hibernate dialect for a database: PostgreSQL gets {@link HapiFhirPostgresDialect}; H2 gets
	 * {@link H2InlineTextDialect} unless {@code riskbridge.fhir.h2-inline-text=false} asks for HAPI's own
	 * {@link HapiFhirH2Dialect}. A non-blank {@code riskbridge.fhir.dialect} (a class name) overrides both.
	 */
	static String dialectFor(Database theDatabase, boolean theH2InlineText, String theOverride) {
		if (theOverride != null && !theOverride.isBlank()) {
			return theOverride.trim();
		}
		if (theDatabase == Database.H2 && !theH2InlineText) {
			return HapiFhirH2Dialect.class.getName();
		}
		return theDatabase.myDialectClassName;
	}

	@Bean(destroyMethod = "close")
	public BasicDataSource dataSource(
			@Value("${spring.datasource.url:jdbc:h2:mem:riskbridge;DB_CLOSE_DELAY=-1}") String theUrl,
			@Value("${spring.datasource.username:sa}") String theUsername,
			@Value("${spring.datasource.password:}") String thePassword,
			@Value("${riskbridge.fhir.db-max-connections:20}") int theMaxConnections) {
		BasicDataSource retVal = new BasicDataSource();
		retVal.setDriverClassName(Database.forUrl(theUrl).myDriverClassName);
		retVal.setUrl(withoutCloseOnExit(theUrl));
		retVal.setUsername(theUsername);
		retVal.setPassword(thePassword);
		retVal.setMaxTotal(theMaxConnections);
		retVal.setMaxWait(Duration.ofSeconds(30));
		return retVal;
	}

	/**
	 * H2 closes its databases from a JVM shutdown hook by default - before Spring has stopped HAPI's
	 * schedulers and background tasks, which then fail with "Database is already closed". With
	 * DB_CLOSE_ON_EXIT=FALSE the database is closed when the connection pool is, in order.
	 */
	static String withoutCloseOnExit(String theUrl) {
		if (theUrl.startsWith("jdbc:h2:") && !theUrl.toUpperCase(Locale.ROOT).contains("DB_CLOSE_ON_EXIT")) {
			return theUrl + ";DB_CLOSE_ON_EXIT=FALSE";
		}
		return theUrl;
	}

	@Bean
	@Primary
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory theBeanFactory,
			FhirContext theFhirContext,
			JpaStorageSettings theStorageSettings,
			DataSource theDataSource,
			@Value("${riskbridge.fhir.hbm2ddl:update}") String theHbm2ddl,
			@Value("${riskbridge.fhir.h2-indexed-id-lookup:true}") boolean theIndexedIdLookup,
			@Value("${riskbridge.fhir.h2-inline-text:true}") boolean theInlineText,
			@Value("${spring.datasource.url:jdbc:h2:mem:riskbridge;DB_CLOSE_DELAY=-1}") String theUrl,
			@Value("${riskbridge.fhir.dialect:}") String theDialect) {
		Database database = Database.forUrl(theUrl);
		LocalContainerEntityManagerFactoryBean retVal =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(theBeanFactory, theFhirContext, theStorageSettings);
		retVal.setPersistenceUnitName("HAPI_PU");
		retVal.setDataSource(theDataSource);

		Properties jpaProperties = new Properties();
		// H2: resource bodies as inline strings, not large objects (see H2InlineTextDialect). PostgreSQL: HAPI's own.
		jpaProperties.put("hibernate.dialect", dialectFor(database, theInlineText, theDialect));
		jpaProperties.put("hibernate.hbm2ddl.auto", theHbm2ddl);
		jpaProperties.put("hibernate.search.enabled", "false");
		jpaProperties.put("hibernate.format_sql", "false");
		jpaProperties.put("hibernate.show_sql", "false");
		// Hibernate logs each SQL warning at WARN: on PostgreSQL the schema update's "constraint ... does not exist,
		// skipping" notices, about 25 lines per start. SQL errors are still logged.
		jpaProperties.put("hibernate.jdbc.log.warnings", "false");
		jpaProperties.put("hibernate.jdbc.batch_size", "20");
		jpaProperties.put("hibernate.cache.use_query_cache", "false");
		jpaProperties.put("hibernate.cache.use_second_level_cache", "false");
		jpaProperties.put("hibernate.cache.use_structured_entries", "false");
		jpaProperties.put("hibernate.cache.use_minimal_puts", "false");
		if (theIndexedIdLookup && database == Database.H2) {
			// H2 scans HFJ_RESOURCE for HAPI's multi-id lookups unless they are written as a row-value IN list.
			jpaProperties.put("hibernate.session_factory.statement_inspector", new H2ResourceIdLookup());
		}
		retVal.setJpaProperties(jpaProperties);
		return retVal;
	}

	/** Primary, so that any other transaction manager that sneaks in cannot make injection ambiguous. */
	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory theEntityManagerFactory) {
		JpaTransactionManager retVal = new JpaTransactionManager();
		retVal.setEntityManagerFactory(theEntityManagerFactory);
		return retVal;
	}

	@Bean
	@Primary
	public HibernatePropertiesProvider hibernatePropertiesProvider() {
		return new HibernatePropertiesProvider();
	}

	// ---------------------------------------------------------------- services JpaConfig expects

	@Bean
	public IFulltextSearchSvc fullTextSearchSvc() {
		return new FulltextSearchSvcImpl();
	}

	@Bean
	public IHSearchSortHelper extendedFulltextSortHelper(@Lazy ISearchParamRegistry theSearchParamRegistry) {
		return new HSearchSortHelperImpl(theSearchParamRegistry);
	}

	@Bean
	public IStaleSearchDeletingSvc staleSearchDeletingSvc() {
		return new StaleSearchDeletingSvcImpl();
	}

	@Bean
	public DatabaseBackedPagingProvider databaseBackedPagingProvider(
			@Value("${riskbridge.fhir.default-page-size:20}") int theDefaultPageSize,
			@Value("${riskbridge.fhir.max-page-size:1000}") int theMaxPageSize) {
		DatabaseBackedPagingProvider retVal = new DatabaseBackedPagingProvider();
		retVal.setDefaultPageSize(theDefaultPageSize);
		retVal.setMaximumPageSize(theMaxPageSize);
		return retVal;
	}

	@Bean
	public IResourceSupportedSvc resourceSupportedSvc(IDaoRegistry theDaoRegistry) {
		return new DaoRegistryResourceSupportedSvc(theDaoRegistry);
	}

	@Bean(name = "myResourceCountsCache")
	public ResourceCountCache resourceCountsCache(IFhirSystemDao<?, ?> theSystemDao) {
		return ResourceCountCacheUtil.newResourceCountCache(theSystemDao);
	}

	/** Binary content (e.g. large Binary / attachment payloads) is kept in the same database. */
	@Bean
	public IBinaryStorageSvc binaryStorageSvc() {
		return new DatabaseBinaryContentStorageSvcImpl();
	}

	/** Subscriptions are not enabled; anything that would send e-mail is just logged. */
	@Bean
	public IEmailSender emailSender() {
		return new LoggingEmailSender();
	}
}
